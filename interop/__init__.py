"""Released SAE formats: readers and writers of Gemma Scope, SAE-Lens and dictionary_learning.

Each format is one module with one declarative map (`foreign.Layout`): the format's name for an
architecture -> the suite architecture it becomes and how each suite tensor is made from the
file's tensors. A loaded SAE is an instance of a suite class of `baselines/` (the architectures
under test), so it is evaluated with no special case. This package may import `baselines`;
`baselines` imports neither this package nor `benchmark`.

Files are data: nothing read from a file is imported, evaluated or unpickled as code
(docs/security.md).
"""
