"""rtcontour models: networks, training, export, model packages and inference."""
