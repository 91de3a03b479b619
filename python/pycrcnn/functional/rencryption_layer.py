"""The original PyCrCNN's ``pycrcnn.functional.rencryption_layer``:
:class:`RencryptionLayer` ``(HE)``, callable: decrypts and encrypts afresh (a
full noise budget). It needs the secret key; on a server it is a round trip to
the client (:meth:`pycrcnn.client.Client.classify` does it)."""
from ..layers import RencryptionLayer

__all__ = ["RencryptionLayer"]
