"""Super-resolution models for FAIG: architectures, a timm-style registry and checkpoint I/O."""
from faig_fast.models.registry import create_model, list_models, list_presets, register_model
from faig_fast.models.msrresnet import MSRResNet
from faig_fast.models.srcnn_style import SRCNNStyle
from faig_fast.models.checkpoint import (
    infer_msrresnet_args,
    import_model_class,
    infer_srcnn_style_args,
    load_model,
    load_state_dict_file,
    read_metadata,
    save_model,
)

__all__ = [
    "MSRResNet", "SRCNNStyle",
    "create_model", "list_models", "list_presets", "register_model",
    "load_model", "import_model_class", "save_model", "load_state_dict_file", "read_metadata",
    "infer_msrresnet_args", "infer_srcnn_style_args",
]
