# cython: language_level=3
# Placeholder replaced by the supervoxel implementation (issue: supervoxels).
def _placeholder():
    return None
