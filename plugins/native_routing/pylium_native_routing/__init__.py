"""pylium plugin `native`: Native routing: routes to other nodes' pod CIDRs, identity from the ipcache."""
