-- Exact integer arithmetic for money and quantities. DuckDB divides DECIMALs into DOUBLE, so every
-- division that reaches an amount goes through HUGEINT with an explicit rounding rule.
-- (a macro's body is indented under its `create macro ... as` line)
-- noqa: disable=LT02

-- n / d rounded half-up (half away from zero for negative n); d > 0.
create or replace macro div_half_up(n, d) as
    case
        when n::hugeint >= 0 then (2 * n::hugeint + d::hugeint) // (2 * d::hugeint)
        else -((2 * (-n::hugeint) + d::hugeint) // (2 * d::hugeint))
    end;

-- ceil(n / d) for n >= 0, d > 0.
create or replace macro ceil_div(n, d) as (n::hugeint + d::hugeint - 1) // d::hugeint;

-- a DECIMAL with at most 9 decimal places as an exact integer count of 1e-9 units.
-- (integer and fractional parts apart, so values past 10^20 do not overflow DECIMAL(38, 9))
create or replace macro to_nano(x) as
    trunc(x::decimal(38, 9))::hugeint * 1000000000
    + ((x::decimal(38, 9) - trunc(x::decimal(38, 9))) * 1000000000)::hugeint;

-- back from 1e-9 units to DECIMAL(38, 9), exactly.
create or replace macro from_nano(n) as (n::decimal(38, 0) * 0.000000001::decimal(10, 9))::decimal(38, 9);

-- a float64 sample value as an exact DECIMAL: through its shortest round-trip text (what
-- Prometheus prints), because DuckDB's double -> decimal cast scales in floating point and
-- corrupts the last digits of values above about 4.6e9.
create or replace macro exact_value(v) as v::varchar::decimal(38, 9);

-- a DECIMAL as text without trailing zeros: 10.500000000 -> 10.5, 3.000000000 -> 3
create or replace macro fmt_decimal(x) as rtrim(rtrim(x::decimal(38, 9)::varchar, '0'), '.');

-- a quantity in base units in billing units (the divisor of seeds/units.csv), rounded half-up to
-- 1e-9 as invoice lines round it: 5905580032 bytes -> 5.5 (GiB)
create or replace macro to_billing_units(x, divisor) as from_nano(div_half_up(to_nano(x), divisor));
