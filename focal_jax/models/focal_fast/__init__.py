"""Focal-fast attention: each window attends to static sets of nearest pixels and pooled
windows, chosen exactly as the official constructor chooses them (`torch_topk`)."""
