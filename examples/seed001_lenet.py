"""Seed 001 ("每天五分钟跟学pytorch day2: 神经网络的训练过程") with cnnlab: the tutorial's LeNet `Net`,
verbatim, on 32x32 MNIST (its `16 * 5 * 5` flatten size needs 32x32 inputs: cnnlab resizes the
digits with image_size=32), plain SGD lr 0.01.

    python examples/seed001_lenet.py            # MNIST (torchvision, downloaded into data/)
    python examples/seed001_lenet.py --quick    # 600 embedded digits, 1 epoch, offline
"""
import os
import sys

import torch.nn as nn
import torch.nn.functional as F

import cnnlab


# ---- the tutorial's network, verbatim ----
class Net(nn.Module):
    def __init__(self):
        super(Net, self).__init__()
        # 定义卷积层和全连接层
        self.conv1 = nn.Conv2d(1, 6, 5)  # 输入通道数1,输出通道数6,卷积核大小5
        self.conv2 = nn.Conv2d(6, 16, 5)  # 输入通道数6,输出通道数16,卷积核大小5
        self.fc1 = nn.Linear(16 * 5 * 5, 120)  # 全连接层,输入大小16*5*5,输出大小120
        self.fc2 = nn.Linear(120, 84)  # 全连接层,输入大小120,输出大小84
        self.fc3 = nn.Linear(84, 10)  # 全连接层,输入大小84,输出大小10

    def forward(self, x):
        # 前向传播过程
        x = F.max_pool2d(F.relu(self.conv1(x)), (2, 2))  # 激活函数和池化操作
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)  # 激活函数和池化操作
        x = x.view(-1, self.num_flat_features(x))  # 展平操作
        x = F.relu(self.fc1(x))  # 激活函数
        x = F.relu(self.fc2(x))  # 激活函数
        x = self.fc3(x)
        return x

    def num_flat_features(self, x):
        # 计算展平后的特征数
        size = x.size()[1:]  # 除去批大小维度的其余维度
        num_features = 1
        for s in size:
            num_features *= s
        return num_features
# ---- end of the tutorial's network ----


def main(quick):
    data = dict(data="mnist-5k", train_samples=600, test_samples=200) if quick else dict(data="mnist")
    out = os.path.join("runs", "examples", "seed001")
    result = cnnlab.train(model=Net(), **data, image_size=32, optimizer="sgd", momentum=0.0, lr=0.01, batch_size=32,
                          augment="none", epochs=1 if quick else 5, out=out, overwrite=True)
    print(result)


if __name__ == "__main__":
    main(quick="--quick" in sys.argv[1:] or os.environ.get("CNNLAB_QUICK") == "1")
