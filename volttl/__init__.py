"""volttl: 3D medical image classification by transfer learning (CTPA, PE)."""

__version__ = "0.1.0"
