"""Shared by the scripts that run the official RG-LCD code beside ours (scripts/check_official_*.py)."""


def resize_tensors_as_torchvision_0_16():
    """rg-lcd pins torchvision 0.16.2, whose tensor resize does not antialias (antialias="warn" is off for
    tensors); later versions antialias by default. Makes torchvision.transforms.functional.resize, which Resize and
    HPSv2's ResizeMaxSize call, resize tensors as 0.16.2 does."""
    import torchvision.transforms.functional as TF

    tensor_resize = TF.resize

    def resize(img, size, interpolation=TF.InterpolationMode.BILINEAR, max_size=None, antialias=None):
        return tensor_resize(img, size, interpolation, max_size, antialias=False)

    TF.resize = resize


def verdict(worst: float, tolerance: float) -> int:
    """Prints whether the largest difference stays within tolerance; the script's exit status."""
    print("match" if worst <= tolerance else "MISMATCH")
    return 0 if worst <= tolerance else 1
