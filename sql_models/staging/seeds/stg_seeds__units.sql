-- Unit conversions from seeds/units.csv: how many base units make one billing unit.
/* config
materialized: view
*/
with source as (
    select * from seed_units
),

final as (
    select
        unit::varchar as unit,
        billing_unit::varchar as billing_unit,
        divisor::bigint as divisor
    from source
)

select * from final
