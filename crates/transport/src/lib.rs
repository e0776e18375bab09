//! chorus-transport: UDP datagram I/O for Chorus (multicast v4/v6, broadcast, unicast peers).
