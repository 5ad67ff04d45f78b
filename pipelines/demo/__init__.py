"""The embedded real demo set "outfits", made of Fashion-MNIST photos."""
