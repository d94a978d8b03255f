-- Currencies from seeds/currencies.csv with their minor-unit exponent (usd 2, jpy 0).
/* config
materialized: view
*/
with source as (
    select * from seed_currencies
),

final as (
    select
        currency::varchar as currency,
        minor_unit_exponent::integer as minor_unit_exponent
    from source
)

select * from final
