"""The "outfits" demo set, made of real Fashion-MNIST photos (docs/data.md)."""
