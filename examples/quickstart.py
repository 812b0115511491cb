import torch, torchvision
import bconv

# any timm or torchvision CNN, or your own; weights="DEFAULT" starts from ImageNet weights (a download)
model = torchvision.models.resnet18(weights=None, num_classes=10)
model = bconv.wrap_with_ptl(model, input_size=(3, 32, 32))  # a BConv-Cell ladder beside every stage
data = torchvision.datasets.FakeData(32, (3, 32, 32), 10, transform=torchvision.transforms.ToTensor())
loader = torch.utils.data.DataLoader(data, batch_size=8, shuffle=True)
opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)

for epoch in range(2):
    model.reset_state()  # forget the last epoch's history, as the paper does
    model.train()
    for x, y in loader:
        loss = torch.nn.functional.cross_entropy(model(x), y)
        opt.zero_grad(); loss.backward(); opt.step()
        model.detach_state()  # cut the graph to the previous batch
    print(f"epoch {epoch}: loss {loss.item():.3f}, ladder share {bconv.ladder_usage(model, x, y).output_share:.1e}")
model.eval()  # eval: zero state, so a sample's output depends on that sample alone
