"""Training the shapes Kontext: the VAE on shapes scenes, then the transformer with the runtime's flow objective."""
