"""Studies to the HDF5 window store: resample, resize, index windows, write atomically."""
