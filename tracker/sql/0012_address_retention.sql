-- Client addresses are kept whole for TRACKER_IP_RETENTION_DAYS; then `tracker maintain` truncates
-- them (IPv4 to its /24, IPv6 to its /48, written as the network: `192.0.2.0/24`) and notes when.
-- A nullable column without a default: adding it rewrites nothing, and the click writer, which
-- names its columns, never sends it.
ALTER TABLE clicks ADD COLUMN client_ip_truncated_at timestamptz;

-- The daily partitions whose addresses are truncated: each is done once, not scanned every night.
CREATE TABLE address_truncated_days (
    day          date PRIMARY KEY,
    truncated_at timestamptz NOT NULL DEFAULT now()
);

-- An address as its network, or NULL for text that is not an address (never an error that would
-- stop the night's run halfway).
CREATE FUNCTION truncated_address(address text) RETURNS text LANGUAGE plpgsql IMMUTABLE AS $$
DECLARE
    a inet;
BEGIN
    a := address::inet;
    RETURN network(set_masklen(a, CASE WHEN family(a) = 4 THEN 24 ELSE 48 END))::text;
EXCEPTION WHEN others THEN
    RETURN NULL;
END $$;
