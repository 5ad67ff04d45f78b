"""PyTorch's side of bench_runtimes.py: torchvision's ResNet as Keras' ResNet v1 with
the crl head, Keras' weights copied in, and the paper's objective in torch.

`torch` and `torchvision` are passed in (optional packages, imported by the caller).
"""

import re

import numpy as np

from mlcrl_tf.modeling import backbones
from mlcrl_tf.modeling import losses

TORCH_NAMES = {"bias": "bias", "gamma": "weight", "beta": "bias", "moving_mean": "running_mean",
               "moving_variance": "running_var"}  # Keras weight -> torch parameter or buffer


def torch_module(mods, layer):
    """The torch module that takes the weights of Keras layer `layer`."""
    trunk = mods["trunk"]
    if layer.startswith("conv1_"):
        return trunk[int(layer.endswith("bn"))]
    match = re.fullmatch(r"conv(\d)_block(\d+)_(\d)_(conv|bn)", layer)
    if match:  # Keras conv2..conv5 = torchvision layer1..layer4 = trunk[4..7]
        block = trunk[2 + int(match[1])][int(match[2]) - 1]
        if match[3] == "0":
            return block.downsample[0 if match[4] == "conv" else 1]
        return getattr(block, f"{match[4]}{match[3]}")
    if layer.startswith("image_projector/"):
        return mods["f_im"][layer.split("/")[1]]
    if layer.startswith("label_projector/fc"):
        return mods["f_l"][2 * (int(layer[-1]) - 1)]
    return mods[layer]


def copy_keras_weights(torch, mods, arrays):
    """Keras' weights into the torch modules; a conv's bias (torchvision's have none) goes
    into the running mean of the BatchNorm after it (exact: BN(x + b) = BN'(x))."""
    conv_biases = {}
    with torch.no_grad():
        for path in arrays.files:
            layer, name = path.rsplit("/", 1)
            module, value = torch_module(mods, layer), arrays[path]
            if name == "kernel":
                value = value.transpose(3, 2, 0, 1) if value.ndim == 4 else value.T
                module.weight.copy_(torch.from_numpy(np.ascontiguousarray(value)))
            elif name == "bias" and module.bias is None:
                conv_biases[layer] = value
            else:
                getattr(module, TORCH_NAMES[name]).copy_(torch.from_numpy(value))
        for layer, bias in conv_biases.items():
            torch_module(mods, layer[:-4] + "bn").running_mean.sub_(torch.from_numpy(bias))


def torch_model(torch, torchvision, backbone, num_classes, arrays):
    """torchvision's `backbone` with Keras' v1 strides (in a stage's first 1x1 conv, not
    its 3x3) and epsilon, the crl head, f_im and f_l, with Keras' weights."""
    nn, c = torch.nn, num_classes
    dims = (c, c // 2, c // 4, c // 2, c)  # f_l's Dense layers, ReLU between
    net = getattr(torchvision.models, backbone)(weights=None)
    for stage in (net.layer2, net.layer3, net.layer4):
        stage[0].conv1.stride, stage[0].conv2.stride = (2, 2), (1, 1)
    for bn in (m for m in net.modules() if isinstance(m, nn.BatchNorm2d)):
        bn.eps = 1.001e-5  # keras.applications' ResNet
    mods = nn.ModuleDict({
        "trunk": nn.Sequential(net.conv1, net.bn1, net.relu, net.maxpool, net.layer1,
                               net.layer2, net.layer3, net.layer4),
        "classifier": nn.Linear(2048, c), "f_conv": nn.Conv2d(2048, c, 1),
        "f_im": nn.ModuleDict({
            "conv1": nn.Conv2d(c, c, 3, 2, bias=False), "bn1": nn.BatchNorm2d(c, 1e-3),
            "conv2": nn.Conv2d(c, c // 4, 3, padding=1, bias=False),
            "bn2": nn.BatchNorm2d(c // 4, 1e-3), "conv3": nn.Conv2d(c // 4, c, 3, padding=1)}),
        "f_l": nn.Sequential(*[m for i, o in zip(dims, dims[1:]) for m in (
            nn.Linear(i, o), nn.ReLU())][:-1])})
    copy_keras_weights(torch, mods, arrays)
    return mods


def torch_logits(torch, mods, batch, backbone, channels_last):
    """(logits, Fconv) of the crl inference model on RGB [0, 255] images (B, S, S, 3)."""
    spec = backbones.normalization_spec(backbone)
    x = batch.permute(0, 3, 1, 2)  # NHWC memory is channels_last already
    x = x if channels_last else x.contiguous()
    x = (x.flip(1) if spec["reverse_channels"] else x) / torch.tensor(
        spec["divisor"]).reshape(-1, 1, 1) + torch.tensor(spec["offset"]).reshape(-1, 1, 1)
    features = mods["trunk"](x)
    maps = mods["f_conv"](features)
    pooled = features.mean((2, 3)) + features.amax((2, 3))
    return mods["classifier"](pooled) + maps.amax((2, 3)), maps


def torch_objective(torch, logits, fe, emb, labels):
    """The paper's objective as `objective.Objective()` computes it (Eq. 9, 10)."""
    def distances(a, b):  # losses.pairwise_distances: 0, with a zero gradient, at 0
        squared = (a[:, None, :] - b[None, :, :]).square().sum(-1)
        return torch.where(squared > 0, torch.where(squared > 0, squared, 1.0).sqrt(), 0.0)
    margin, c = losses.DEFAULT_MARGIN, emb.shape[0]
    pos, neg = labels, 1.0 - labels
    num_pos, num_neg = pos.sum(1), neg.sum(1)
    d_img = distances(fe, emb)
    hinge = torch.relu(margin + d_img[:, :, None] - d_img[:, None, :])
    image = (hinge * pos[:, :, None] * neg[:, None, :]).sum() / (num_pos * num_neg).sum()
    d_lab = distances(emb, emb)
    hinge_lab = torch.relu(margin + d_lab[:, :, None] - d_lab[:, None, :]) * (
        1.0 - torch.eye(c))[:, :, None]
    per_pair = hinge_lab.reshape(c * c, c) @ neg.T
    pos_pairs = (pos[:, :, None] * pos[:, None, :]).reshape(-1, c * c)
    label_count = (num_pos * (num_pos - 1) * num_neg).sum().clamp(min=1.0)
    return (torch.nn.functional.multilabel_soft_margin_loss(logits, labels)
            + losses.DEFAULT_IMAGE_WEIGHT * image
            + losses.DEFAULT_LABEL_WEIGHT * (per_pair * pos_pairs.T).sum() / label_count)
