"""Generated code (`make proto`) for containerd's snapshots service and Mount type, from the
`.proto` files beside it. Do not edit the `*_pb2*` files: edit the `.proto` and regenerate."""
