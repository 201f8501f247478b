"""``seglab bench``: the benchmarks that run and measure the pipeline (quality against classical
baselines, conformal calibration, retraining, scale and reruns)."""
