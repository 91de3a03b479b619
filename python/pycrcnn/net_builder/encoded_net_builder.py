"""The original PyCrCNN's ``net_builder.encoded_net_builder``:
``build_from_pytorch(HE, net, rencrypt_positions=[])`` (the original's last
commit dropped the third argument; both call styles work)."""
from ..model import build_from_pytorch

__all__ = ["build_from_pytorch"]
