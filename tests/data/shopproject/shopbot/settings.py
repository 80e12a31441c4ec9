"""Settings of the test project: what `scrapy crawl` and geoscrape both read."""

BOT_NAME = "shopbot"
SPIDER_MODULES = ["shopbot.spiders"]
NEWSPIDER_MODULE = "shopbot.spiders"

ROBOTSTXT_OBEY = True
CONCURRENT_REQUESTS = 4
DOWNLOAD_DELAY = 0
# geoscrape overrides these two (a warning in `geoscrape check` and the run's note).
TELNETCONSOLE_ENABLED = True
DOWNLOAD_TIMEOUT = 600

ITEM_PIPELINES = {
    "shopbot.pipelines.DropCategoryPipeline": 100,
    "shopbot.pipelines.PriceBandPipeline": 300,
}
SHOPBOT_DROP_CATEGORY = "garden"  # items of this category are dropped (DropItem)
SHOPBOT_TAG = "from-settings"  # the spider's custom_settings replace it

FEED_EXPORT_ENCODING = "utf-8"
TWISTED_REACTOR = "twisted.internet.asyncioreactor.AsyncioSelectorReactor"
