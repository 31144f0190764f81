"""`ebbtide activator`: a reverse proxy in front of one InferenceService's Service that holds
requests while no replica is ready (scale-from-zero, Knative's activator is the model), forwards
them the moment one is, and exports how many it holds for `scaling.activation.query`."""
