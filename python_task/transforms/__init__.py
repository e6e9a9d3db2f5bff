"""Per-tile transforms: stain normalisation, augmentation (Keras layers and OpenCV pipeline), and their preview."""
