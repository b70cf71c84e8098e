"""The decode core: the Model facade, the engine contract, requests and their scheduler,
samples and beams, the logits chain, text and tokenizers."""
