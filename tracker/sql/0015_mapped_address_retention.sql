-- An IPv4-mapped IPv6 address (`::ffff:198.51.100.9`, what a dual-stack listener on `::` reports for
-- an IPv4 client, stored so before tracker took the IPv4 form) truncates as the IPv4 address it
-- carries, to its /24: as IPv6 every such address truncated to `::/48`, one value for all.
CREATE OR REPLACE FUNCTION truncated_address(address text) RETURNS text LANGUAGE plpgsql IMMUTABLE AS $$
DECLARE
    a inet;
BEGIN
    a := address::inet;
    IF family(a) = 6 AND a <<= '::ffff:0.0.0.0/96'::inet THEN
        a := '0.0.0.0'::inet + (host(a)::inet - '::ffff:0.0.0.0'::inet);
    END IF;
    RETURN network(set_masklen(a, CASE WHEN family(a) = 4 THEN 24 ELSE 48 END))::text;
EXCEPTION WHEN others THEN
    RETURN NULL;
END $$;
