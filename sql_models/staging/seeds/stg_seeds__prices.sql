-- Price rows from seeds/prices.csv: per plan version and meter, allowance and unit or package price.
/* config
materialized: view
*/
with source as (
    select * from seed_prices
),

final as (
    select
        plan_id::varchar as plan_id,
        version::integer as plan_version,
        meter_id::varchar as meter_id,
        dimension::varchar as dimension,
        included_quantity::decimal(38, 9) as included_quantity,
        included_pool::varchar as included_pool,
        pricing::varchar as pricing,
        unit_price::decimal(38, 9) as unit_price,
        package_size::bigint as package_size,
        package_rounding::varchar as package_rounding,
        description::varchar as price_description,
        seed_line::integer as price_line
    from source
)

select * from final
