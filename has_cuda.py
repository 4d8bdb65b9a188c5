"""Report whether PyTorch sees a CUDA GPU (run by the dev container after it is created)."""

import torch


def main() -> None:
    has_cuda = torch.cuda.is_available()
    device = torch.device("cuda" if has_cuda else "cpu")
    n_gpu = torch.cuda.device_count() if has_cuda else 0
    print(f"has_cuda = {has_cuda}")
    print(f"device = {device}")
    print(f"n_gpu = {n_gpu}")
    print(f"torch = {torch.__version__}, built with CUDA {torch.version.cuda}")
    if has_cuda:
        print(f"cudnn = {torch.backends.cudnn.version()}")
        for i in range(n_gpu):
            print(f"gpu {i} = {torch.cuda.get_device_name(i)}")


if __name__ == "__main__":
    main()
