"""fsmis-monai: few-shot medical image segmentation on MONAI.

Five published few-shot segmentation methods (SSL-ALPNet, LSLPN, GMRD, PAMI, DIFD) and their bases
(ADNet, Q-Net) re-implemented on one framework: preprocessing recipes, supervoxel pseudolabels,
episodic datasets, encoders, methods, ignite engines and a sliding 2D-slice volumetric evaluator.
"""

__version__ = "0.1.0"
