"""3D Grad-CAM over a study's windows, stitched and written back on the original CT grid."""
