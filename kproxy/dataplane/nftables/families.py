"""nf_tables' address families: their NFPROTO_* numbers, as netlink carries them, and their
names, as `nft` prints them."""

from __future__ import annotations

NFT_FAMILIES = {0: "unspec", 1: "inet", 2: "ip", 3: "arp", 5: "netdev", 7: "bridge", 10: "ip6"}
# Per IP family (4 or 6): the NFPROTO_* number of its family, and that family's name.
NFPROTO = {4: 2, 6: 10}
NFT_FAMILY_NAMES = {family: NFT_FAMILIES[number] for family, number in NFPROTO.items()}
