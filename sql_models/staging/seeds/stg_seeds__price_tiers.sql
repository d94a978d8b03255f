-- Tiers of graduated and volume prices from seeds/price_tiers.csv (up_to in billing units; empty = no bound).
/* config
materialized: view
*/
with source as (
    select * from seed_price_tiers
),

final as (
    select
        plan_id::varchar as plan_id,
        version::integer as plan_version,
        meter_id::varchar as meter_id,
        dimension::varchar as dimension,
        tier::integer as tier,
        up_to::decimal(38, 9) as up_to,
        unit_price::decimal(38, 9) as unit_price,
        flat_fee::decimal(38, 9) as flat_fee
    from source
)

select * from final
