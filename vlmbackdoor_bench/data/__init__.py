"""Caption datasets: Karpathy-format loaders, the embedded world and the dataset providers."""

from .karpathy import KarpathyRecord, decode_image, load_karpathy_split, read_karpathy_json, write_karpathy
from .providers import (
    COCO_KARPATHY,
    EMBEDDED_COCO,
    EMBEDDED_FLICKR,
    FLICKR30K_KARPATHY,
    PROVIDERS,
    EmbeddedWorldProvider,
    KarpathyProvider,
    register_datasets,
)
from .world import (
    CATEGORIES, SOURCE_CONCEPTS, WORLD_VERSION, WorldSizes, generate_world, load_scenes, world_paths,
)

__all__ = [
    "CATEGORIES", "COCO_KARPATHY", "EMBEDDED_COCO", "EMBEDDED_FLICKR", "FLICKR30K_KARPATHY",
    "PROVIDERS", "SOURCE_CONCEPTS", "WORLD_VERSION", "EmbeddedWorldProvider", "KarpathyProvider",
    "KarpathyRecord", "WorldSizes", "decode_image", "generate_world", "load_karpathy_split",
    "load_scenes", "read_karpathy_json", "register_datasets", "world_paths", "write_karpathy",
]
