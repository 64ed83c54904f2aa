def test_trained_run_has_files(trained_run):
    for name in ("best.pt", "last.pt", "history.csv", "metrics.json", "run.json"):
        assert (trained_run / name).is_file(), name
