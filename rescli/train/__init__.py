"""Fine-tuning: ``rescli.train.loop.finetune`` takes a data folder to a run folder.

In the order a run goes through them:
    settings.py     TrainSettings, their checks, the strategy and runtime they resolve to
    prepare.py      before the first step: new or resumed run, run folder, checked data, start weights, datasets
    lr_find.py      the learning-rate range test (rescli lr-find, --lr auto)
    features.py     backbone features computed once, for head-only training without augmentation
    loop.py         finetune: prepare, then the epoch loop (train, validate, record, save), then the tail
    epoch.py        one epoch: its batches (images or cached features) as one stream, a step on each
    step.py         one optimiser step (Trainer) and the loss and hits of a batch (SoftmaxObjective)
    schedule.py     warmup + cosine per phase, and each epoch's seeded order
    params.py       what trains: frozen backbone, layer groups, AdamW groups
    mixing.py       mixup and cutmix of a batch
    validation.py   the validation pass after each epoch
    state.py        TrainingState (what last.pt holds beside model and optimiser), RNG states, seeding
    records.py      best.pt, last.pt and run.json
    run_folder.py   run folders: naming, locking, skipped.txt, history.csv, the stored split
    finish.py       after the last epoch: best.pt evaluated, temperature, metrics and report files
    interrupts.py   Ctrl-C / SIGTERM: finish the step, save, stop
    distributed.py  torch.distributed: ranks, batch sharding, gathers
    launch.py       --gpus N: re-run the command under torchrun (torch-free)
"""
