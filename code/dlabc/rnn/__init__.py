"""Part "RNNs": recurrence and backpropagation through time, LSTM and GRU, a
character-level language model, sequence to sequence with attention."""
