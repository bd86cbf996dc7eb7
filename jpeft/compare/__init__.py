"""`jpeft compare`: the seed article's experiments as one command.

Several methods (any registered method with its flags, `--methods full,lora:r=8,qlora:r=8,adalora,sora`) are
trained on the same data for the same budget and seeds. Each method picks its learning rate from a small grid on a
seeded validation split carved from the training data; then every seed trains with that rate and is scored on the
eval data (macro P/R/F1 for label data, else eval loss). Every run is a plain `jpeft train` process in its own
folder, so a run's memory and time are its own, a killed comparison resumes where it stopped, and each folder is a
normal `jpeft train` output. Modules: `plan` (the `--methods` grammar, refusals, the list of runs), `runner`
(the runs, learning-rate choice), `report` (tables, compare.json/compare.md) and `plot` (compare.png).
"""
