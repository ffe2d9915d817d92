"""What runs on Ray and MLflow: jobs (train, evaluate, register), tracking and the model
registry, Ray Tune sweeps."""
