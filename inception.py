"""The FID Inception v3: TensorFlow's inception-2015-12-05 graph as pytorch-fid 0.3.0 ports it, for FID and IS.

pytorch-fid's FIDInceptionA/C/E_1/E_2 blocks and torchvision's B/D, with the FID patches (TF-style average pools that
ignore padding, a max pool in Mixed_7c, BatchNorm eps 1e-3) and torchvision's module names, so that pytorch-fid's
weight file `pt_inception-2015-12-05-6726825d.pth` (472 tensors) loads strictly with no key map; evaluate.py finds,
downloads and loads it. Features and logits are bit-identical to pytorch-fid's and torch-fidelity's networks on the
same input (docs/results.md).
"""
import torch
import torch.nn as nn
import torch.nn.functional as F

DIMS = (64, 192, 768, 2048)  # pytorch-fid's --dims: the channels at the end of each of its four blocks


class BasicConv2d(nn.Module):
    def __init__(self, cin, cout, kernel_size, stride=1, padding=0):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, kernel_size, stride, padding, bias=False)
        self.bn = nn.BatchNorm2d(cout, eps=0.001)  # TF's epsilon; torch's 1e-5 changes features by ~1e3

    def forward(self, x):
        return F.relu(self.bn(self.conv(x)))


def tf_avg_pool(x):  # TF's average pool ignores the padded zeros (torchvision counts them)
    return F.avg_pool2d(x, 3, stride=1, padding=1, count_include_pad=False)


K1x7, K7x1 = dict(kernel_size=(1, 7), padding=(0, 3)), dict(kernel_size=(7, 1), padding=(3, 0))  # factorised 7x7
K1x3, K3x1 = dict(kernel_size=(1, 3), padding=(0, 1)), dict(kernel_size=(3, 1), padding=(1, 0))  # factorised 3x3


class InceptionA(nn.Module):  # Mixed_5b/5c/5d: (cin, 35, 35) -> (224 + pool_features, 35, 35)
    def __init__(self, cin, pool_features):
        super().__init__()
        self.branch1x1 = BasicConv2d(cin, 64, 1)
        self.branch5x5_1, self.branch5x5_2 = BasicConv2d(cin, 48, 1), BasicConv2d(48, 64, 5, padding=2)
        self.branch3x3dbl_1 = BasicConv2d(cin, 64, 1)
        self.branch3x3dbl_2, self.branch3x3dbl_3 = BasicConv2d(64, 96, 3, padding=1), BasicConv2d(96, 96, 3, padding=1)
        self.branch_pool = BasicConv2d(cin, pool_features, 1)

    def forward(self, x):
        b5 = self.branch5x5_2(self.branch5x5_1(x))
        b3 = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        return torch.cat([self.branch1x1(x), b5, b3, self.branch_pool(tf_avg_pool(x))], 1)


class InceptionB(nn.Module):  # Mixed_6a: (288, 35, 35) -> (768, 17, 17)
    def __init__(self, cin):
        super().__init__()
        self.branch3x3 = BasicConv2d(cin, 384, 3, stride=2)
        self.branch3x3dbl_1 = BasicConv2d(cin, 64, 1)
        self.branch3x3dbl_2, self.branch3x3dbl_3 = BasicConv2d(64, 96, 3, padding=1), BasicConv2d(96, 96, 3, stride=2)

    def forward(self, x):
        b3 = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        return torch.cat([self.branch3x3(x), b3, F.max_pool2d(x, 3, stride=2)], 1)


class InceptionC(nn.Module):  # Mixed_6b-6e: (768, 17, 17) -> same, 7x7 convolutions factorised into 1x7 and 7x1
    def __init__(self, cin, c7):
        super().__init__()
        self.branch1x1 = BasicConv2d(cin, 192, 1)
        self.branch7x7_1, self.branch7x7_2 = BasicConv2d(cin, c7, 1), BasicConv2d(c7, c7, **K1x7)
        self.branch7x7_3 = BasicConv2d(c7, 192, **K7x1)
        self.branch7x7dbl_1, self.branch7x7dbl_2 = BasicConv2d(cin, c7, 1), BasicConv2d(c7, c7, **K7x1)
        self.branch7x7dbl_3, self.branch7x7dbl_4 = BasicConv2d(c7, c7, **K1x7), BasicConv2d(c7, c7, **K7x1)
        self.branch7x7dbl_5 = BasicConv2d(c7, 192, **K1x7)
        self.branch_pool = BasicConv2d(cin, 192, 1)

    def forward(self, x):
        b7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
        d7 = self.branch7x7dbl_2(self.branch7x7dbl_1(x))
        d7 = self.branch7x7dbl_5(self.branch7x7dbl_4(self.branch7x7dbl_3(d7)))
        return torch.cat([self.branch1x1(x), b7, d7, self.branch_pool(tf_avg_pool(x))], 1)


class InceptionD(nn.Module):  # Mixed_7a: (768, 17, 17) -> (1280, 8, 8)
    def __init__(self, cin):
        super().__init__()
        self.branch3x3_1, self.branch3x3_2 = BasicConv2d(cin, 192, 1), BasicConv2d(192, 320, 3, stride=2)
        self.branch7x7x3_1, self.branch7x7x3_2 = BasicConv2d(cin, 192, 1), BasicConv2d(192, 192, **K1x7)
        self.branch7x7x3_3, self.branch7x7x3_4 = BasicConv2d(192, 192, **K7x1), BasicConv2d(192, 192, 3, stride=2)

    def forward(self, x):
        b7 = self.branch7x7x3_4(self.branch7x7x3_3(self.branch7x7x3_2(self.branch7x7x3_1(x))))
        return torch.cat([self.branch3x3_2(self.branch3x3_1(x)), b7, F.max_pool2d(x, 3, stride=2)], 1)


class InceptionE(nn.Module):  # Mixed_7b (average-pool branch), Mixed_7c (max-pool branch: a quirk of the TF graph)
    def __init__(self, cin, max_pool):
        super().__init__()
        self.max_pool = max_pool
        self.branch1x1 = BasicConv2d(cin, 320, 1)
        self.branch3x3_1 = BasicConv2d(cin, 384, 1)
        self.branch3x3_2a, self.branch3x3_2b = BasicConv2d(384, 384, **K1x3), BasicConv2d(384, 384, **K3x1)
        self.branch3x3dbl_1, self.branch3x3dbl_2 = BasicConv2d(cin, 448, 1), BasicConv2d(448, 384, 3, padding=1)
        self.branch3x3dbl_3a, self.branch3x3dbl_3b = BasicConv2d(384, 384, **K1x3), BasicConv2d(384, 384, **K3x1)
        self.branch_pool = BasicConv2d(cin, 192, 1)

    def forward(self, x):
        b3, d3 = self.branch3x3_1(x), self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        pool = F.max_pool2d(x, 3, stride=1, padding=1) if self.max_pool else tf_avg_pool(x)
        return torch.cat([self.branch1x1(x), self.branch3x3_2a(b3), self.branch3x3_2b(b3),
                          self.branch3x3dbl_3a(d3), self.branch3x3dbl_3b(d3), self.branch_pool(pool)], 1)


class InceptionV3(nn.Module):
    def __init__(self):
        super().__init__()
        self.Conv2d_1a_3x3 = BasicConv2d(3, 32, 3, stride=2)
        self.Conv2d_2a_3x3 = BasicConv2d(32, 32, 3)
        self.Conv2d_2b_3x3 = BasicConv2d(32, 64, 3, padding=1)
        self.Conv2d_3b_1x1 = BasicConv2d(64, 80, 1)
        self.Conv2d_4a_3x3 = BasicConv2d(80, 192, 3)
        self.Mixed_5b, self.Mixed_5c, self.Mixed_5d = InceptionA(192, 32), InceptionA(256, 64), InceptionA(288, 64)
        self.Mixed_6a = InceptionB(288)
        self.Mixed_6b, self.Mixed_6c = InceptionC(768, 128), InceptionC(768, 160)
        self.Mixed_6d, self.Mixed_6e = InceptionC(768, 160), InceptionC(768, 192)
        self.Mixed_7a = InceptionD(768)
        self.Mixed_7b, self.Mixed_7c = InceptionE(1280, max_pool=False), InceptionE(2048, max_pool=True)
        self.fc = nn.Linear(2048, 1008)  # the TF softmax layer: only IS uses it, without its bias

    def forward(self, x, dims=2048):
        """x (B, 3, 299, 299) in [-1, 1] -> (B, dims): the spatial mean at the end of pytorch-fid's block of `dims`
        channels (2048: pool3, the standard FID)."""
        x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))  # (B, 64, 147, 147)
        x = F.max_pool2d(x, 3, stride=2)  # (B, 64, 73, 73)
        if dims > 64:
            x = F.max_pool2d(self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(x)), 3, stride=2)  # (B, 192, 35, 35)
        if dims > 192:
            for block in (self.Mixed_5b, self.Mixed_5c, self.Mixed_5d, self.Mixed_6a, self.Mixed_6b, self.Mixed_6c,
                          self.Mixed_6d, self.Mixed_6e):
                x = block(x)  # (B, 288, 35, 35) after 5d, (B, 768, 17, 17) after 6a-6e
        if dims > 768:
            x = self.Mixed_7c(self.Mixed_7b(self.Mixed_7a(x)))  # (B, 2048, 8, 8)
        return F.adaptive_avg_pool2d(x, 1).flatten(1)

    def logits(self, x):
        """x (B, 3, 299, 299) -> (B, 1008): torch-fidelity's "logits_unbiased", the input of its Inception Score."""
        return self(x) @ self.fc.weight.T


# -----------------------------------------------------------------------------
# the input of each tool: the same network, two preprocessings (they move features by up to ~7 %)


def fid_input(x):
    """pytorch-fid: x (B, 3, H, W) float in [0, 1] (uint8 / 255) -> bilinear 299 (align_corners=False) -> [-1, 1]."""
    return 2 * F.interpolate(x, size=(299, 299), mode="bilinear", align_corners=False) - 1


def fidelity_input(x):
    """torch-fidelity: x (B, 3, H, W) float in [0, 255] -> TF1 legacy bilinear 299 (no half-pixel offset) -> /128."""
    def grid(n_in):  # source coordinate dst * in/out; neighbours floor and floor + 1 (clamped)
        g = torch.arange(299, dtype=torch.float32) * torch.tensor(n_in / 299, dtype=torch.float32)
        lo = g.long()
        return lo, (lo + 1).clamp_max(n_in - 1), g - lo.float()
    (y0, y1, dy), (x0, x1, dx) = grid(x.shape[2]), grid(x.shape[3])
    rows0, rows1 = x[:, :, y0], x[:, :, y1]  # (B, 3, 299, W)
    top = rows0[..., x0] + (rows0[..., x1] - rows0[..., x0]) * dx
    bottom = rows1[..., x0] + (rows1[..., x1] - rows1[..., x0]) * dx
    return (top + (bottom - top) * dy[:, None] - 128) / 128
