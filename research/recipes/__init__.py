"""Training recipes shared by experiments and method areas: the image classifier trainer
(``classify``) and the masked-autoencoder generator trainer (``mae_train``). They sit above core,
data and models, and below the method areas that train classifiers (anytime, multiplicity)."""
