"""One file per federated algorithm; `ALGORITHMS` in spryjax/build.py maps config names to factories."""
