"""A script in the original PyCrCNN's style: build the encrypted layers from a
torch model's modules with the original classes, encrypt a few MNIST digits,
run ``for layer in encoded_net``, decrypt, and compare with the plain model.

The only line that differs from a script written for the original is the
Pyfhel import. Usage: python classify_mnist.py MODEL.pt N_IMAGES
"""
import json
import sys
import time

import numpy as np
import torch

from pycrcnn import Pyfhel  # the original: from Pyfhel import Pyfhel
from pycrcnn.convolutional.convolutional_layer import ConvolutionalLayer
from pycrcnn.crypto.crypto import decrypt_matrix, encrypt_matrix
from pycrcnn.functional.average_pool import AveragePoolLayer
from pycrcnn.functional.flatten_layer import FlattenLayer
from pycrcnn.functional.square_layer import SquareLayer
from pycrcnn.linear.linear_layer import LinearLayer
from pycrcnn import datasets  # the digits (the original downloaded them with torchvision)

model_path, n_images = sys.argv[1], int(sys.argv[2])

HE = Pyfhel()
HE.contextGen(p=953983721, m=4096)
HE.keyGen()
HE.relinKeyGen(20, 5)

plain_net = torch.load(model_path, weights_only=False)  # a full pickled model, as the original saved them
plain_net.eval()


def encoded_layer(layer):
    kind = type(layer).__name__
    if kind == "Conv2d":
        return ConvolutionalLayer(HE, weights=layer.weight.detach().numpy(), stride=layer.stride,
                                  padding=layer.padding, bias=layer.bias.detach().numpy())
    if kind == "Linear":
        return LinearLayer(HE, layer.weight.detach().numpy(), layer.bias.detach().numpy())
    if kind == "AvgPool2d":
        return AveragePoolLayer(HE, layer.kernel_size, layer.stride)
    if kind == "Flatten":
        return FlattenLayer()
    if kind == "Square":
        return SquareLayer(HE)
    raise ValueError("no encrypted layer for " + kind)


encoded_net = [encoded_layer(layer) for layer in plain_net]

images, labels = datasets.load_mnist(split="test", limit=n_images)
images = datasets.normalize(images)  # [N, 1, 28, 28], pixels / 255

start = time.time()
encrypted = encrypt_matrix(HE, images)
for layer in encoded_net:
    encrypted = layer(encrypted)
    print(type(layer).__name__, "noise budget", HE.noiseLevel(encrypted))
result = decrypt_matrix(HE, encrypted)
seconds = time.time() - start

plain = plain_net(torch.tensor(images)).detach().numpy()
print(json.dumps({
    "encrypted_argmax": result.argmax(axis=1).tolist(),
    "plain_argmax": plain.argmax(axis=1).tolist(),
    "labels": labels.tolist(),
    "max_error": float(np.max(np.abs(result - plain))),
    "seconds": seconds,
}))
