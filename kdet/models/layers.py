"""Small layers of the SSD model: L2 normalisation and input preprocessing."""

import keras
from keras import ops


@keras.saving.register_keras_serializable(package="kdet")
class L2Normalization(keras.layers.Layer):
    """L2-normalise each position over channels, then scale per channel.

    ParseNet / SSD conv4_3: ``y = gamma * x / ||x||_2`` with a learnable
    ``gamma`` of shape ``[C]`` initialised to ``scale`` (20 in SSD), which
    brings conv4_3's small-norm features to the range of the deeper maps.
    """

    def __init__(self, scale=20.0, epsilon=1e-10, **kwargs):
        super().__init__(**kwargs)
        self.scale = float(scale)
        self.epsilon = float(epsilon)

    def build(self, input_shape):
        self.gamma = self.add_weight(
            name="gamma", shape=(input_shape[-1],),
            initializer=keras.initializers.Constant(self.scale), trainable=True)

    def call(self, x):
        norm = ops.sqrt(ops.sum(ops.square(x), axis=-1, keepdims=True))
        return x / (norm + self.epsilon) * ops.cast(self.gamma, x.dtype)

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        config = super().get_config()
        config.update(scale=self.scale, epsilon=self.epsilon)
        return config


# keras.applications preprocessing modes, for RGB 0..255 inputs.
_CAFFE_BGR_MEAN = (103.939, 116.779, 123.68)
_TORCH_MEAN = (0.485, 0.456, 0.406)
_TORCH_STD = (0.229, 0.224, 0.225)


@keras.saving.register_keras_serializable(package="kdet")
class ImagePreprocessing(keras.layers.Layer):
    """RGB 0..255 images -> the input a keras.applications backbone expects.

    ``mode`` follows ``keras.applications.imagenet_utils.preprocess_input``:
    ``"caffe"`` (VGG16, ResNet50): RGB -> BGR, subtract the ImageNet BGR mean;
    ``"tf"`` (MobileNetV2): scale to [-1, 1];
    ``"torch"``: scale to [0, 1], subtract mean, divide by std (RGB).
    """

    MODES = ("caffe", "tf", "torch")

    def __init__(self, mode="caffe", **kwargs):
        super().__init__(**kwargs)
        if mode not in self.MODES:
            raise ValueError(f"ImagePreprocessing: mode must be one of {self.MODES}, got {mode!r}")
        self.mode = mode

    def call(self, images):
        images = ops.cast(images, self.compute_dtype)
        if self.mode == "caffe":
            return ops.flip(images, axis=-1) - ops.convert_to_tensor(_CAFFE_BGR_MEAN, images.dtype)
        if self.mode == "tf":
            return images / 127.5 - 1.0
        mean = ops.convert_to_tensor(_TORCH_MEAN, images.dtype)
        std = ops.convert_to_tensor(_TORCH_STD, images.dtype)
        return (images / 255.0 - mean) / std

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        config = super().get_config()
        config.update(mode=self.mode)
        return config
