"""The built-in datasets' classes: how many, and their names (ground floor: no TensorFlow, no I/O)."""

NUM_CLASSES = 10  # both built-in datasets: labels 0..9
CLASS_NAMES = {
    "fashion_mnist": ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
                      "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"),
    "mnist": tuple(str(i) for i in range(10)),
}
