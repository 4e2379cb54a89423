"""cowdisk: copy-on-write root disks for microVM sandboxes."""
