"""Studies to the HDF5 store: resample, resize, index windows, write atomically."""
