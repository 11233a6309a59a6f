"""The offline model factory: preparation, variant recipes, transforms, calibration and training. Never on the serving path."""
