"""Reading studies (DICOM series, NIfTI, PENet HDF5) into HU volumes with their geometry."""

from volttl.io.geometry import Geometry, Volume
from volttl.io.studies import StudyReadError, read_study

__all__ = ["Geometry", "Volume", "StudyReadError", "read_study"]
