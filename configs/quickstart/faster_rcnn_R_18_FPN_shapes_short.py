"""Short quickstart as a Python config: the twin of faster_rcnn_R_18_FPN_shapes_short.yaml.

Faster R-CNN with a ResNet-18-FPN trained from scratch on the synthetic "shapes" dataset (generated on
first use under ./datasets/shapes, or $D2B_DATASETS/shapes), on CPU in a few minutes, writing
metrics.json, model_final.pth, curves.png and predictions.png into train.output_dir:
    python -m d2_backbones.lazy_train --config-file configs/quickstart/faster_rcnn_R_18_FPN_shapes_short.py
Same model, data, image size, batch, workers, schedule and evaluations (iterations 100, 200 and the end)
as the yaml; the evaluations run on the model itself (the yaml evaluates an optimized copy: same results).
"""
from detectron2.config import LazyCall as L

from d2_backbones.lazy import RGB_MEAN, RGB_STD, coco_loaders, fpn, mask_rcnn_fpn, multistep_lr, sgd, train_settings
from d2_backbones.resnet import build_resnet

bottom_up = L(build_resnet)(depth=18, stride_in_1x1=False, norm="BN", freeze_at=0,  # from scratch: train everything
                            zero_init_residual=True)
model = mask_rcnn_fpn(fpn(bottom_up, ["res2", "res3", "res4", "res5"], out_channels=64), num_classes=3,
                      pixel_mean=RGB_MEAN, pixel_std=RGB_STD, input_format="RGB")
del model.roi_heads.mask_in_features, model.roi_heads.mask_pooler, model.roi_heads.mask_head  # Faster R-CNN
model.proposal_generator.anchor_generator.sizes = [[16], [32], [64], [128], [256]]  # small images, small objects
model.proposal_generator.update(batch_size_per_image=64, pre_nms_topk=(300, 300), post_nms_topk=(150, 100))
model.roi_heads.batch_size_per_image = 64
model.roi_heads.box_head.fc_dims = [256, 256]
model.roi_heads.box_predictor.input_shape.channels = 256

dataloader = coco_loaders(train="shapes_train", test="shapes_val", image_format="RGB", use_instance_mask=False,
                          min_size_train=(128,), max_size_train=128, min_size_test=128, max_size_test=128,
                          total_batch_size=8, num_workers=0)
optimizer = sgd(lr=0.02)
lr_multiplier = multistep_lr(max_iter=300, steps=(220, 280), warmup_iters=50)
train = train_settings(max_iter=300, device="cpu", eval_period=100, checkpoint_period=100, max_to_keep=2,
                       seed=42, output_dir="output/quickstart_short_py")
