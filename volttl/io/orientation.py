"""One stored orientation for every study, whatever its source's voxel order.

The same CT comes as a DICOM series (columns to the patient's left, rows to posterior),
as a dcm2niix NIfTI (rows flipped: LAS), as an RAS NIfTI or as an LPS NRRD. Stored as
read, these would be three differently flipped tensors, and a cohort mixing them would
train on anatomy flipped front to back between sources. So every volume is first put in
the canonical voxel order **LPS**: voxel axis i runs towards the patient's left, j
towards posterior, k towards superior (the usual DICOM axial order), by a permutation
and flips of its axes only (no resampling; an in-plane rotation stays in the direction
cosines). Each voxel axis goes to the patient axis its direction is closest to.

The index map from the canonical grid back to the source grid is returned as a 4x4
matrix, so that maps computed on the stored grid land on the source's own grid.
"""

from __future__ import annotations

import numpy as np

from volttl.errors import VolttlError
from volttl.io.geometry import Geometry, Volume

CANONICAL = "LPS"  # voxel axes i, j, k towards patient left, posterior, superior


class OrientationError(VolttlError):
    """A grid whose voxel axes cannot be assigned to patient axes."""


def canonical_map(geometry: Geometry) -> np.ndarray:
    """4x4 signed permutation: canonical voxel ``(i', j', k', 1)`` -> source ``(i, j, k, 1)``."""
    d = np.asarray(geometry.direction, dtype=float)  # columns: source axes in LPS
    patient_axis = np.argmax(np.abs(d), axis=0)  # for each source axis
    if sorted(patient_axis.tolist()) != [0, 1, 2]:
        raise OrientationError(f"voxel axes {np.round(d, 3).tolist()} are too oblique to assign each to one "
                               "patient axis")
    n_kji = geometry.shape
    m = np.zeros((4, 4))
    m[3, 3] = 1.0
    for a in range(3):  # source axis a (0=i, 1=j, 2=k)
        c = int(patient_axis[a])
        if d[c, a] >= 0:
            m[a, c] = 1.0
        else:
            m[a, c], m[a, 3] = -1.0, n_kji[2 - a] - 1
    return m


def to_canonical(vol: Volume) -> tuple[Volume, np.ndarray]:
    """The volume in LPS voxel order, and the canonical -> source index map."""
    m = canonical_map(vol.geometry)
    if np.array_equal(m, np.eye(4)):
        return vol, m
    src_of = [int(np.flatnonzero(m[:, c][:3])[0]) for c in range(3)]  # source axis of canonical c
    # array axes are (k, j, i): canonical array axis 2 - c holds source array axis 2 - src_of[c]
    hu = np.transpose(vol.hu, [2 - src_of[2 - ax] for ax in range(3)])
    flips = tuple(2 - c for c in range(3) if m[src_of[c], c] < 0)
    hu = np.ascontiguousarray(np.flip(hu, axis=flips) if flips else hu)
    geometry = Geometry.from_affine_lps(vol.geometry.affine_lps() @ m, hu.shape)
    return Volume(hu=hu, geometry=geometry, source_kind=vol.source_kind), m
